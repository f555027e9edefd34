"""deploy/ and docker/: the Kubernetes manifests, the Dockerfiles, the alert rules and the metrics they use."""
