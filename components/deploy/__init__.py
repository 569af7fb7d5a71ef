"""Stage 4, deploy: export, variants, registration, the gate's promotion, and when to retrain (`stage.deploy`)."""
