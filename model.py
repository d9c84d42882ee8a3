"""(being written) LLaVA model."""
IMAGE_TOKEN_INDEX = -200
