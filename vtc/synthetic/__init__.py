"""The synthetic world behind `make train`: the digit-grid VQA generator, the tiny encoder's
pre-training, and the analyses of where a trained model's answers and attention go."""
