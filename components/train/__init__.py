"""Stage 2, fine-tune: every transfer strategy, the shared epoch loop, distributed training (`stage.fine_tune`)."""
