"""Put an adapter on a model in place: ``attach(model, adapter)``."""
