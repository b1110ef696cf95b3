"""Training: the loop (trainer), where its loss is compiled (compiled), the checks on a
saved training state (checkpoint_state) and TensorBoard curves (tensorboard).
May import model/, config/, objectives/."""
