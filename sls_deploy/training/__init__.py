"""The training loop shared by base training, searches and finetuning (the losses belong to the modalities)."""
