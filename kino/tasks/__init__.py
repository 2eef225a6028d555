"""Task functions over the models: each is a thin function (reconstruct now; generation tasks later)."""
