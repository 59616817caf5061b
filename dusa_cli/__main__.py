from dusa_cli.cli import main

main()
