"""YAML presets, shipped as package data: configs/<method>/<world>.yaml."""
