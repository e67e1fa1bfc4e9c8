from otfuse_cli.cli import main

main()
