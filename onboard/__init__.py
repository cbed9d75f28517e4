"""Car side: fallback inference, compression, transport client, measurement, merge, the daemon."""
