"""The stages (search, finetune, export, validate, engine validation, build) over one skeleton, for any strategy and modality."""
