from fuyu_cli.app import main

main()
