from rali_edge.cli import main

main(prog_name="rali-edge")
