"""Tests for H (foreign and hostile input) of RELIABILITY.md, on the shared broker."""
