"""System C: learned token merger + layer-wise pruner heads for LLaVA-1.5, trained adversarially."""
