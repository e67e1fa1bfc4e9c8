from otfuse_cli.entry import main

main()
