"""Third-party weights into kino's classes and model folders (`kino convert`)."""
