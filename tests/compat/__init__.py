"""loomc 0.3.0's public-API tests, kept verbatim: code written against 0.3.0 must run unchanged."""
