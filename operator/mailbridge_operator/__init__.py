"""The MailBridge Kubernetes operator (kopf)."""
