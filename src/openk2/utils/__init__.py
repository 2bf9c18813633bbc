"""Small helpers shared across areas."""
