"""Parallel runtime: msrun environment -> rank, world size, data- and tensor-parallel groups."""
