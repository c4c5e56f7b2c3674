"""The actor agent: a Flyte connector that runs actor tasks on fleets of warm replicas."""
