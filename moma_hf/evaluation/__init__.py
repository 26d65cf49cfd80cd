"""Results out: metrics, plots and the model card."""
