"""Phone-side skills: what the phone answers on its own."""
