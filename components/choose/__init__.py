"""Stage 1, choose: rank candidate backbones on the user's data (`stage.choose_model`)."""
