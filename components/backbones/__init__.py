"""Pre-trained backbones: the zoo, the deployable classifier around one, which blocks train, features and export (torch)."""
