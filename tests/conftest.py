import os
import sys

# The scripts are flat files at the repository root; tests import them and each other's helpers.
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
