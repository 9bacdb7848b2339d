// Command sendemail serves the sendemail function alone, as its Cloud Run
// service does: the HTTP trigger plus the consumer loop.
package main

import (
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/serve"
)

func main() { serve.Main(sendemail.Function) }
