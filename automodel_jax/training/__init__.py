"""Training: the jitted train and eval steps, optimizer and schedule, the loop's pieces, metrics, profiling."""
