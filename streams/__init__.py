"""What flows: the Faust app, settings, topic names, record schemas and the pure exchange adapters."""
