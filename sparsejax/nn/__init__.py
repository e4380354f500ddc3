"""Always-sparse training: layers whose memory and compute are linear in their connections."""
