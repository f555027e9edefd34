"""deploy/ and docker/: the Kubernetes manifests (rendered with a real kustomize, validated against the API
schemas), the Dockerfiles, the alert rules and the metrics they name. Fast: no cluster and no servers, only
`kubectl kustomize` (and promtool where installed). manifests.py holds what the tests read from the manifests."""
