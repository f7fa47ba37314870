"""From a deployment YAML to a cluster: Kubernetes manifests (`jaxpd deploy render`)."""
