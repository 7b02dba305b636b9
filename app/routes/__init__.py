"""HTTP routes, one module per resource: segment (uploads), jobs, results, health/metrics."""
