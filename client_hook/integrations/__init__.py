"""Framework adapters and tracker forwarding. Each module imports its library (Lightning,
transformers, accelerate, TensorBoard, MLflow, W&B) and is imported only by its users, never by
`client_hook` itself; none of those libraries is a dependency of the base install."""
