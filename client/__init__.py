"""The hospital side: Flower ClientApp and local DP-SGD training."""
