// Command serve runs every function in one process, each at /<Name> as in the
// Functions Framework's multi-function mode, with their background loops: the
// whole pipeline on one laptop. `make run` starts it.
package main

import (
	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/serve"
)

func main() {
	serve.Main(createuser.Function, relay.Function, sendemail.Function)
}
