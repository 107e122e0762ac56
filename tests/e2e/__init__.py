"""End-to-end tests with real reverse proxies in front of the controller."""
