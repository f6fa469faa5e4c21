"""Cost adapters for the Anthropic and OpenAI SDKs (the loomc 0.3.0 module path)."""

from loomc.integrations.adapters import AnthropicAdapter, OpenAIAdapter, Price, estimate_input_tokens

__all__ = ["AnthropicAdapter", "OpenAIAdapter", "Price", "estimate_input_tokens"]
