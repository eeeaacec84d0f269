"""How each method trains and predicts whole images (its networks live in gigaseg.models)."""
