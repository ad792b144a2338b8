"""Explaining features: dashboards of what a feature responds to and writes."""
