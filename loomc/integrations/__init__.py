"""Integrations with model providers: cost adapters for the Anthropic and OpenAI SDKs, prices, embeddings."""
