"""Model definitions (Flax NNX). Models know logical axis names, never meshes."""
