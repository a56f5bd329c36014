"""Model cards and Hub helpers."""
