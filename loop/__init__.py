"""The self-improvement loop for a Russian vision-language model and the user's commands."""
