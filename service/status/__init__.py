"""What the status page shows that no other domain answers: job progress over time, workers."""
