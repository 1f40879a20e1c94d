"""Pure label helpers: the auto-labels every registration applies, and selector checks."""

GIB = 1024**3

# Buckets of LocalAI's `gpu.vram` label, largest first.
_VRAM_BUCKETS_GB = (80, 48, 24, 16, 8)

MAX_LABEL_PART = 255


def vram_bucket(total_vram: int) -> str:
    """The `gpu.vram` label for a total VRAM in bytes: 8GB, 16GB, 24GB, 48GB, 80GB+, else <n>GB."""
    gigabytes = total_vram // GIB
    if gigabytes >= _VRAM_BUCKETS_GB[0]:
        return f"{_VRAM_BUCKETS_GB[0]}GB+"
    for bucket in _VRAM_BUCKETS_GB[1:]:
        if gigabytes >= bucket:
            return f"{bucket}GB"
    return f"{gigabytes}GB"


def auto_labels(*, name: str, gpu_vendor: str, total_vram: int, max_replicas_per_model: int) -> dict[str, str]:
    """Labels the control plane derives at every registration (they overwrite their own keys).

    `gpu.vram` is only set for nodes that report VRAM, so CPU nodes do not claim "0GB" of GPU.
    """
    labels = {
        "gpu.vendor": gpu_vendor or "unknown",
        "node.name": name,
        "node.replica-slots": str(max(1, max_replicas_per_model or 1)),
    }
    if total_vram:
        labels["gpu.vram"] = vram_bucket(total_vram)
    return labels


def validate_labels(labels) -> dict[str, str]:
    """Return ``labels`` as a str->str dict, or raise ValueError naming what is wrong."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValueError("labels must be an object of string keys to string values")
    clean = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError("label keys must be non-empty strings")
        if not isinstance(value, str):
            raise ValueError(f"label {key!r} must have a string value")
        if len(key) > MAX_LABEL_PART or len(value) > MAX_LABEL_PART:
            raise ValueError(f"label {key!r} is longer than {MAX_LABEL_PART} characters")
        clean[key] = value
    return clean


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """AND semantics: every pair of the selector is present in the labels; {} matches all."""
    return all(labels.get(key) == value for key, value in selector.items())
