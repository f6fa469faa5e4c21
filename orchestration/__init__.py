"""orchestration: multi-agent pipelines where each agent is a loomc loop."""
