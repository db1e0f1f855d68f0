"""How the step is made fast: convolution plans for many learners, plans chosen by measurement, compiling."""
