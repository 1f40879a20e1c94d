"""The fleet's state: nodes, labels, replicas, load info, scheduling config and their verbs."""
