"""Ray clusters: submitting samtone commands as jobs, and watching or stopping them."""
