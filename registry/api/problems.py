"""Domain problems of the registry API (rendered by ``core.problems.exception_handler``)."""

from rest_framework import status

from core.problems import ProblemError


class NoLoadInfo(ProblemError):
    """Neither a per-model load-info row nor a loaded replica row with a blob exists."""

    status_code = status.HTTP_404_NOT_FOUND
    default_code = "no_load_info"
    default_detail = "No load info is stored for this model."
    title = "No load info"


class InvalidModelOptions(ProblemError):
    """The ModelOptions sent (base64 blob or JSON) do not parse as ``backend.ModelOptions``."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_model_options"
    default_detail = "The model options are not a valid ModelOptions message."
    title = "Invalid model options"


class InvalidTransition(ProblemError):
    """A node status transition that does not apply to the node's current status."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "invalid_transition"
    default_detail = "The node's current status does not allow this transition."
    title = "Invalid status transition"


class NodeTokenRequired(ProblemError):
    """A registration without ``auth_mode: node_token`` for a name whose node holds a per-node
    token: it would hand the node to anyone with the fleet token."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "node_token_required"
    default_detail = (
        'This node holds a per-node token: register with "auth_mode": "node_token", or have an operator '
        "delete the node first."
    )
    title = "Node token required"


class DrainedByOperator(ProblemError):
    """A node's ``/resume`` of a drain an operator set: only an operator lifts it."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "drained_by_operator"
    default_detail = "An operator drained this node; only an operator's resume lifts the drain."
    title = "Drained by an operator"


class TooManyLabels(ProblemError):
    """A label write (operator API, or a registration) that would leave the node with more
    labels than ``CONTROLPLANE_MAX_LABELS_PER_NODE``; nothing was written."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "too_many_labels"
    default_detail = "The node would carry more labels than allowed per node."
    title = "Too many labels"


class NodeCredentialRequired(ProblemError):
    """A re-registration of an existing node-token node without its current node token
    (``X-Node-Token``): the fleet token alone must not take the node over."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "node_credential_required"
    default_detail = (
        "A node of this name exists and holds a per-node token: present it in the X-Node-Token header to "
        "re-register, or have an operator delete the node first."
    )
    title = "Node credential required"


class ReplicaNotVouched(ProblemError):
    """A frontend reported a replica that the node does not vouch for: its worker does not list
    a running backend of that model and replica at that address (or, for a node without the
    worker service, the address is not on the node's registered host)."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "replica_not_vouched"
    default_detail = "The node does not vouch for a backend of this replica at this address."
    title = "Replica not vouched for"


class RevisionNotFound(ProblemError):
    """A rollback named a revision number the model does not have."""

    status_code = status.HTTP_404_NOT_FOUND
    default_code = "revision_not_found"
    default_detail = "The model has no such revision."
    title = "Revision not found"


class RevisionCurrent(ProblemError):
    """A rollback to the revision that is current already (nothing would change)."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "revision_current"
    default_detail = "That revision's load info and scheduling config are current already."
    title = "Revision already current"
