"""Cloud side: the inference service, its deadline-aware scheduler, model runners, auth, health and metrics."""
